"""The WebSocket bridge: NATS ``quotes.>`` -> browsers, conflated; ``sow serve-ws`` and ``/ws``.

One :class:`Bridge` per process subscribes to ``quotes.>`` once and fans the quotes out to every
connected client. ``sow serve-ws`` serves it alone (at ``/ws`` and ``/``); ``sow serve-api``
mounts the same endpoint at ``/ws``.

Protocol (JSON text messages)
-----------------------------
Client -> server::

    {"type": "subscribe",   "symbols": ["BTCUSDT", "ETHUSDT"]}   # "*" = every symbol
    {"type": "unsubscribe", "symbols": ["ETHUSDT"]}              # ["*"] = everything
    {"type": "ping"}                                             # answered {"type": "pong"}

Server -> client::

    {"type": "status", "nats": "connected", "batch_ms": 100, ...}   # on connect and on every
                                                                   # NATS disconnect/reconnect
    {"type": "snapshot", "symbols": [...], "cache": true, "quotes": [...]}   # answers subscribe
    {"type": "quotes", "quotes": [...]}            # at most every ws_batch_ms, only changes
    {"type": "unsubscribed", "symbols": [...]}
    {"type": "error", "error": "bad_request", "detail": "..."}

A symbol covers both markets. Every quote is the Quote JSON of ARCHITECTURE.md plus
``timestamp`` (the exchange time ``ts`` as ISO-8601 UTC with milliseconds).

How the fan-out works, and why
------------------------------
- **Conflation.** Quotes from NATS land in ``changed`` keyed by (market, symbol): a newer quote
  replaces the older one, so a batch holds only the latest value per stream. A batch goes out at
  most every ``ws_batch_ms`` (the first quote after a quiet spell goes at once, later ones wait
  for the window). A quote older than the newest one seen for its stream is not forwarded.
- **Encode once.** A batch is built once per distinct subscription (every ``"*"`` client shares
  one bytes object), then framed and compressed once per window size (:func:`text_frame`): the
  permessage-deflate extension here (:class:`SharedDeflateFactory`) always negotiates
  ``server_no_context_takeover``, so a message compresses to the same bytes for every client
  with the same window size. Each client then costs one ``transport.write``. Compressing each
  batch once per client would cost more CPU than the rest of the bridge together. Each batch
  also starts with a different client, so nobody is always served last.
- **Slow clients.** Each client has a bound (``ws_client_queue_bytes``) on the bytes waiting in
  its socket buffer. A client over the bound is *behind*: its updates collect in a per-client
  dict (latest per stream again, so bounded by the number of streams, never a backlog) and go out
  as one message when its buffer drains. A client behind for ``ws_slow_client_seconds`` is
  disconnected. Nothing a slow client does delays the others: sends never wait.
- **Direct sends.** Under uvicorn with :class:`BridgeWebSocketProtocol` (what ``sow serve-api``
  and ``sow serve-ws`` run) the bridge writes frames straight to the connection and can abort a
  stuck one. Under any other ASGI server it falls back to ASGI ``send`` from one writer task per
  client, with the same bounds.
- **Snapshot.** A subscribe is answered with the latest quote of each requested stream from
  Dragonfly/Redis (``latest:{market}:{symbol}``, one MGET for all), merged with anything newer
  the bridge has seen itself. ``"*"`` covers the configured symbols and markets plus every stream
  seen on NATS. With the cache down the snapshot comes from memory alone (``"cache": false``).
- **Hostile clients.** Origins outside ``ws_allowed_origins`` get HTTP 403 (the server's own
  origin and clients sending no ``Origin`` header, i.e. not browsers, are allowed); beyond
  ``ws_max_clients`` HTTP 503. Messages are bounded (``ws_max_message_bytes``: close 1009) and
  rate-limited; each invalid one is answered with an error, and after
  ``ws_max_invalid_messages`` of them the connection is closed with 1008. uvicorn pings every
  ``ws_ping_interval_seconds`` and closes a connection whose pong is late.
- **NATS outages** are invisible to clients beyond a ``status`` message: the WebSocket stays
  open, nats-py reconnects for ever and restores the subscription.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
import struct
import time
import zlib
from collections import OrderedDict, deque
from collections.abc import (
    Awaitable,
    Callable,
    Collection,
    Generator,
    Iterable,
    Sequence,
)
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol, TypeVar
from urllib.parse import urlsplit

import msgspec
import orjson
import redis.asyncio as aioredis
import uvicorn
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route, WebSocketRoute
from starlette.types import Message, Receive, Scope, Send
from uvicorn.config import Config as UvicornConfig
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from uvicorn.server import ServerState
from websockets.extensions.base import Extension
from websockets.extensions.permessage_deflate import (
    PerMessageDeflate,
    ServerPerMessageDeflateFactory,
)
from websockets.frames import Frame, Opcode
from websockets.http11 import Request as WsRequest
from websockets.protocol import State
from websockets.server import ServerProtocol
from websockets.typing import ExtensionParameter

from sowcli import __version__
from sowcli.bus.nats import (
    QUOTES_WILDCARD,
    connect,
    dropped_by_client,
    instance_id,
    status_subject,
)
from sowcli.config import SYMBOL_RE, Settings, redis_url
from sowcli.errors import ConfigError, UpstreamError, UsageError
from sowcli.logs import kv
from sowcli.model import MARKET_NAMES, Market, Quote, decode_quote, encode_quote
from sowcli.runtime import bind_socket
from sowcli.servers.metrics import CONTENT_TYPE, ServerMetrics
from sowcli.sinks.cache import latest_key

log = logging.getLogger("sow.ws")

ALL_MARKETS: tuple[Market, ...] = ("SPOT", "FUTURES")
DIRECT_EXTENSION = "sow.ws.direct"
"""ASGI scope extension set by :class:`BridgeWebSocketProtocol`: a :class:`DirectChannel`."""
MAX_STREAMS = 100_000  # (market, symbol) pairs the bridge remembers: bounded against bogus input
CLIENT_MESSAGES_PER_S = 20.0  # a client's own messages (subscribe, ping...): token bucket rate
CLIENT_MESSAGES_BURST = 50
CACHE_BREAKER_S = 1.0  # after a failed Redis call, skip Redis for this long (fail fast)
SHARED_DEFLATE_MIN = 256  # messages shorter than this are compressed per client (cheap anyway)
SHARED_DEFLATE_KEEP = 32  # compressed messages remembered per window size
WIRE_MEMO_MAX = 10_000  # Redis values whose decoded/wire forms LatestStore remembers
HEALTH_TIMEOUT_S = 1.0
DEPENDENCIES = ("redis", "questdb", "nats")
Key = tuple[str, str]  # (market, symbol)
T = TypeVar("T")


# --- settings ------------------------------------------------------------------------------


def check_serving(settings: Settings) -> None:
    """Validate the serving keys (ConfigError naming the key); sow's config module checks the
    types, this checks the ranges."""

    def bad(key: str, why: str) -> ConfigError:
        return ConfigError(f"key '{key}': {why} (got {getattr(settings, key)!r})")

    for key in ("api_port", "ws_port"):
        if not 0 <= getattr(settings, key) <= 65535:
            raise bad(key, "must be a port number, 0 to 65535")
    if settings.api_rate_limit_per_second < 0:
        raise bad("api_rate_limit_per_second", "must be 0 (no limit) or more")
    minimum = {
        "api_rate_limit_burst": 1,
        "api_questdb_pool_size": 1,
        "api_query_cache_ms": 0,
        "api_query_cache_entries": 1,
        "ws_max_clients": 1,
        "ws_batch_ms": 1,
        "ws_client_queue_bytes": 1024,
        "ws_max_message_bytes": 256,
        "ws_max_invalid_messages": 1,
        "ws_max_symbols": 1,
    }
    for key, low in minimum.items():
        if getattr(settings, key) < low:
            raise bad(key, f"must be at least {low}")
    if settings.ws_batch_ms > 10_000:
        raise bad("ws_batch_ms", "must be at most 10000")
    unknown = sorted(set(settings.api_health_required) - set(DEPENDENCIES))
    if unknown:
        raise bad("api_health_required", f"unknown dependency {unknown[0]!r} (choose from "
                  f"{', '.join(DEPENDENCIES)})")  # fmt: skip
    for key in ("cors_origins", "ws_allowed_origins"):
        for origin in getattr(settings, key):
            parts = urlsplit(origin)
            if origin != "*" and (parts.scheme not in ("http", "https") or not parts.netloc):
                raise ConfigError(
                    f"key '{key}': {origin!r} is not an origin (e.g. http://localhost:3000, or *)"
                )


def configured_keys(settings: Settings) -> list[Key]:
    """(market, symbol) of every configured stream, sorted by symbol then market."""
    markets = [MARKET_NAMES[m] for m in settings.markets]
    return sorted(((m, s) for s in settings.symbols for m in markets), key=_by_symbol)


def _by_symbol(key: Key) -> tuple[str, str]:
    return (key[1], key[0])


# --- the wire format -----------------------------------------------------------------------

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def iso_ms(ts_ms: int) -> str:
    """Epoch milliseconds -> ``2024-01-01T00:00:00.000Z``; ValueError when out of range."""
    try:
        text = (_EPOCH + timedelta(milliseconds=ts_ms)).isoformat(timespec="milliseconds")
    except OverflowError:
        raise ValueError(f"timestamp {ts_ms} is out of range") from None
    return text[:-6] + "Z"


def wire_quote(quote: Quote) -> bytes:
    """The Quote JSON plus ``timestamp`` (ISO-8601 UTC): what browsers and the API get."""
    return encode_quote(quote)[:-1] + b',"timestamp":"' + iso_ms(quote.ts).encode() + b'"}'


def _message(kind: bytes, wires: Iterable[bytes], extra: bytes = b"") -> bytes:
    return b'{"type":"' + kind + b'"' + extra + b',"quotes":[' + b",".join(wires) + b"]}"


def _order(ts: int, seq: int | None) -> tuple[int, int]:
    return (ts, -1 if seq is None else seq)


# --- the latest quotes in Dragonfly/Redis --------------------------------------------------


class CacheUnavailable(UpstreamError):
    """Dragonfly/Redis did not answer (in time)."""


class LatestStore:
    """Reads ``latest:{market}:{symbol}`` keys: one MGET per call, bounded waits, fail-fast.

    After a failed call the store skips Redis for :data:`CACHE_BREAKER_S` (callers fall back at
    once instead of each waiting for a timeout); :meth:`ping` always tries.
    """

    def __init__(self, url: str, *, timeout_s: float, name: str, max_connections: int = 32) -> None:
        self.url = redis_url(url)
        self.timeout_s = timeout_s
        try:
            pool = aioredis.BlockingConnectionPool.from_url(
                self.url,
                max_connections=max_connections,
                timeout=timeout_s,
                socket_connect_timeout=timeout_s,
                socket_timeout=timeout_s,
                client_name=name,
            )
        except ValueError as exc:
            raise ConfigError(f"dragonfly_url {self.url!r}: {exc}") from None
        self.redis: aioredis.Redis = aioredis.Redis(
            connection_pool=pool, retry=Retry(NoBackoff(), 0)
        )
        parts = urlsplit(self.url)
        self.where = f"{parts.hostname or 'localhost'}:{parts.port or 6379}"
        self.errors = 0
        self.last_error = ""
        self.connected: bool | None = None
        self._down_until = 0.0
        self._memo: dict[bytes, tuple[Quote, bytes]] = {}

    def _failed(self, exc: BaseException) -> CacheUnavailable:
        self.errors += 1
        self.connected = False
        self._down_until = time.monotonic() + CACHE_BREAKER_S
        what = "did not answer in time" if isinstance(exc, TimeoutError) else str(exc)
        self.last_error = what or type(exc).__name__
        return CacheUnavailable(f"Dragonfly/Redis at {self.where}: {self.last_error}")

    async def get(self, keys: Sequence[str]) -> list[bytes | None]:
        """The values of ``keys`` (None where missing); CacheUnavailable when Redis is down."""
        if not keys:
            return []
        if time.monotonic() < self._down_until:
            raise CacheUnavailable(f"Dragonfly/Redis at {self.where}: {self.last_error}")
        try:
            async with asyncio.timeout(self.timeout_s):
                values: list[Any] = await self.redis.mget(keys)
        except (RedisError, OSError, TimeoutError) as exc:
            raise self._failed(exc) from None
        self.connected = True
        return values

    async def entries(self, keys: Sequence[Key]) -> list[tuple[Quote, bytes]]:
        """(Quote, :func:`wire_quote` bytes) of each (market, symbol) that has a latest quote,
        in the order of ``keys`` (undecodable values skipped).

        A value stays in Redis until the next quote of its stream, so most reads return bytes
        seen before: their decoded and re-encoded forms are remembered (bounded), which makes a
        repeated ``/api/prices/latest`` a dictionary lookup per quote.
        """
        values = await self.get([latest_key(m, s) for m, s in keys])
        memo = self._memo
        out = []
        for value in values:
            if value is None:
                continue
            entry = memo.get(value)
            if entry is None:
                try:
                    quote = decode_quote(value)
                    entry = (quote, wire_quote(quote))
                except (msgspec.DecodeError, msgspec.ValidationError, ValueError):
                    continue
                if len(memo) >= WIRE_MEMO_MAX:
                    memo.clear()
                memo[value] = entry
            out.append(entry)
        return out

    async def quotes(self, keys: Sequence[Key]) -> list[Quote]:
        """The latest Quote of each (market, symbol) that has one."""
        return [quote for quote, _wire in await self.entries(keys)]

    async def ping(self, timeout_s: float = HEALTH_TIMEOUT_S) -> float:
        """Round trip of a PING in ms; CacheUnavailable when it fails."""
        started = time.perf_counter()
        try:
            async with asyncio.timeout(min(timeout_s, self.timeout_s * 2)):
                await self.redis.ping()
        except (RedisError, OSError, TimeoutError) as exc:
            raise self._failed(exc) from None
        self.connected = True
        self._down_until = 0.0
        return (time.perf_counter() - started) * 1000

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.redis.aclose()


# --- permessage-deflate, compressed once per message ---------------------------------------

_SHARED: dict[int, OrderedDict[bytes, bytes]] = {}


class SharedDeflate(PerMessageDeflate):
    """permessage-deflate whose output for a message is computed once for every connection.

    Only valid without server context takeover (each message is compressed on its own), which
    :class:`SharedDeflateFactory` always negotiates; the result then depends only on the bytes and
    the window size, so it is remembered per window size for the last few large messages.
    """

    def encode(self, frame: Frame) -> Frame:
        data = frame.data
        if (
            frame.opcode is not Opcode.TEXT
            or not frame.fin
            or not self.local_no_context_takeover
            or type(data) is not bytes
            or len(data) < SHARED_DEFLATE_MIN
        ):
            return super().encode(frame)
        memo = _SHARED.get(self.local_max_window_bits)
        if memo is None:
            memo = _SHARED[self.local_max_window_bits] = OrderedDict()
        packed = memo.get(data)
        if packed is None:
            packed = bytes(super().encode(frame).data)
            memo[data] = packed
            if len(memo) > SHARED_DEFLATE_KEEP:
                memo.popitem(last=False)
        return Frame(frame.opcode, packed, True, True, frame.rsv2, frame.rsv3)


class SharedDeflateFactory(ServerPerMessageDeflateFactory):
    """Negotiates permessage-deflate with ``server_no_context_takeover`` (see SharedDeflate)."""

    def __init__(self) -> None:
        super().__init__(server_no_context_takeover=True, client_max_window_bits=12)

    def process_request_params(
        self, params: Sequence[ExtensionParameter], accepted_extensions: Sequence[Extension]
    ) -> tuple[list[ExtensionParameter], PerMessageDeflate]:
        response, ext = super().process_request_params(params, accepted_extensions)
        shared = SharedDeflate(
            ext.remote_no_context_takeover,
            ext.local_no_context_takeover,
            ext.remote_max_window_bits,
            ext.local_max_window_bits,
            ext.compress_settings,
        )
        return response, shared


_FRAMES: OrderedDict[tuple[int, bytes], bytes] = OrderedDict()


def text_frame(data: bytes, deflate_bits: int = 0) -> bytes:
    """One unmasked, final text frame (server to client) holding ``data``; compressed with
    permessage-deflate (no context takeover, window ``deflate_bits``) when that is not 0 and the
    message is large enough to be worth it. Large frames are remembered (see SharedDeflate)."""
    size = len(data)
    if size < SHARED_DEFLATE_MIN:
        return (
            (b"\x81%c" % size) + data if size < 126 else struct.pack("!BBH", 0x81, 126, size) + data
        )
    key = (deflate_bits, data)
    frame = _FRAMES.get(key)
    if frame is not None:
        return frame
    if deflate_bits:
        packer = zlib.compressobj(wbits=-deflate_bits)
        payload = (packer.compress(data) + packer.flush(zlib.Z_SYNC_FLUSH))[:-4]
        first = 0xC1  # FIN, RSV1 (compressed), text
    else:
        payload, first = data, 0x81
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", first, n)
    elif n < 65536:
        head = struct.pack("!BBH", first, 126, n)
    else:
        head = struct.pack("!BBQ", first, 127, n)
    frame = head + payload
    _FRAMES[key] = frame
    if len(_FRAMES) > SHARED_DEFLATE_KEEP:
        _FRAMES.popitem(last=False)
    return frame


class DirectChannel:
    """Frames written straight to one uvicorn WebSocket connection (no ASGI round trip)."""

    __slots__ = ("_proto",)

    def __init__(self, proto: BridgeWebSocketProtocol) -> None:
        self._proto = proto

    def open(self) -> bool:
        p = self._proto
        return p.handshake_complete and not p.close_sent and not p.disconnected

    def buffered(self) -> int:
        """Bytes accepted but not yet handed to the kernel."""
        return self._proto.transport.get_write_buffer_size()

    def deflate_bits(self) -> int:
        """The server's window size when permessage-deflate was negotiated, else 0."""
        for ext in self._proto.conn.extensions:
            if isinstance(ext, SharedDeflate):
                return ext.local_max_window_bits
        return 0

    def write_frame(self, frame: bytes) -> bool:
        """Write one complete frame made by :func:`text_frame` (False once closed)."""
        p = self._proto
        if not self.open() or p.conn.state is not State.OPEN:
            return False
        p.transport.write(frame)
        return True

    def abort(self) -> None:
        """Drop the connection now, unsent data and all (for a client that stopped reading)."""
        self._proto.transport.abort()


class BridgeWebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's websockets-sansio protocol with :class:`SharedDeflateFactory` and a
    :class:`DirectChannel` in the scope (extension ``sow.ws.direct``)."""

    def __init__(
        self,
        config: UvicornConfig,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.conn = ServerProtocol(
            extensions=[SharedDeflateFactory()] if config.ws_per_message_deflate else [],
            max_size=config.ws_max_size,
            logger=logging.getLogger("uvicorn.error"),
        )

    def handle_connect(self, event: WsRequest) -> None:
        super().handle_connect(event)
        scope = self.__dict__.get("scope")
        if scope is not None and not self.close_sent:
            # The ASGI task was created but has not run yet: it sees this extension.
            scope["extensions"][DIRECT_EXTENSION] = DirectChannel(self)


# --- per-client send paths -----------------------------------------------------------------


class Sink(Protocol):
    closed: bool

    def ready(self) -> bool:
        """True when the client's queued bytes are under its bound."""
        ...

    def send(self, data: bytes) -> None: ...

    def abort(self) -> None: ...


class DirectSink:
    """Writes whole frames: a batch shared by many clients is framed (and compressed) once per
    window size, then each client costs one ``transport.write``."""

    __slots__ = ("bits", "channel", "closed", "limit")

    def __init__(self, channel: DirectChannel, limit: int) -> None:
        self.channel = channel
        self.limit = limit
        self.closed = False
        self.bits = channel.deflate_bits()

    def ready(self) -> bool:
        return self.channel.buffered() < self.limit

    def send(self, data: bytes) -> None:
        if not self.closed and not self.channel.write_frame(text_frame(data, self.bits)):
            self.closed = True

    def abort(self) -> None:
        self.closed = True
        self.channel.abort()


class AsgiSink:
    """Fallback for other ASGI servers: a writer task awaits ``send`` for queued messages."""

    def __init__(self, send: Send, limit: int) -> None:
        self._send = send
        self.limit = limit
        self.closed = False
        self._queue: deque[bytes] = deque()
        self._queued = 0
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._write(), name="ws-writer")

    def ready(self) -> bool:
        return self._queued < self.limit

    def send(self, data: bytes) -> None:
        if not self.closed:
            self._queue.append(data)
            self._queued += len(data)
            self._wake.set()

    async def _write(self) -> None:
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                while self._queue:
                    data = self._queue[0]
                    await self._send({"type": "websocket.send", "text": data.decode()})
                    self._queue.popleft()
                    self._queued -= len(data)
        except Exception:  # the client went away: the session notices on its side
            self.closed = True

    def abort(self) -> None:
        self.closed = True
        self._task.cancel()


# --- clients -------------------------------------------------------------------------------


class TokenBucket:
    __slots__ = ("burst", "last", "rate", "tokens")

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.last = time.monotonic()

    def take(self) -> float:
        """0 when a token was taken; else the seconds until one is available."""
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


_client_ids = itertools.count(1)


class Client:
    """One connected browser: its subscription, its send path and its conflated backlog."""

    __slots__ = (
        "all",
        "behind_since",
        "bucket",
        "excluded",
        "id",
        "invalid",
        "killed",
        "kind",
        "peer",
        "pending",
        "sink",
        "subkey",
        "symbols",
    )

    def __init__(self, sink: Sink, peer: str) -> None:
        self.id = next(_client_ids)
        self.sink = sink
        self.peer = peer
        self.all = False
        self.symbols: set[str] = set()
        self.excluded: set[str] = set()
        self.subkey: tuple[bool, frozenset[str], frozenset[str]] = (False, frozenset(), frozenset())
        self.pending: dict[Key, bytes] | None = None  # set while behind
        self.behind_since = 0.0
        self.invalid = 0
        self.bucket = TokenBucket(CLIENT_MESSAGES_PER_S, CLIENT_MESSAGES_BURST)
        self.killed = asyncio.Event()
        self.kind = ""  # why it was disconnected by us: slow | abuse

    @property
    def active(self) -> bool:
        return self.all or bool(self.symbols)

    def wants(self, key: Key) -> bool:
        symbol = key[1]
        return (self.all and symbol not in self.excluded) or symbol in self.symbols

    def resubscribed(self) -> None:
        self.subkey = (self.all, frozenset(self.symbols), frozenset(self.excluded))
        if self.pending:
            self.pending = {k: v for k, v in self.pending.items() if self.wants(k)}


# --- the bridge ----------------------------------------------------------------------------


@dataclass(slots=True)
class BridgeStats:
    """Counters of a :class:`Bridge` since start."""

    quotes_in: int = 0  # valid quotes seen on NATS
    invalid_in: int = 0  # NATS payloads that are not a Quote
    stale_in: int = 0  # older than the newest quote of their stream: not forwarded
    batches: int = 0
    messages_out: int = 0
    quotes_out: int = 0
    bytes_out: int = 0
    snapshots: int = 0
    coalesced: int = 0  # quotes replaced by a newer one of their stream within one batch window
    conflated: int = 0  # queued quotes replaced by a newer one while their client was behind
    behind: int = 0  # times a client fell behind
    dropped_slow: int = 0  # clients disconnected for staying behind
    dropped_abuse: int = 0  # clients closed with 1008 after too many invalid messages
    refused_origin: int = 0
    refused_full: int = 0
    invalid_messages: int = 0
    connects: int = 0
    clients_peak: int = 0
    nats_reconnects: int = 0
    errors: int = 0
    fanout_seconds: float = 0.0  # time spent writing batches to clients, all together
    fanout_ms_last: float = 0.0  # the last batch's


class Bridge:
    """NATS ``quotes.>`` -> WebSocket clients (see the module docstring).

    ``await start()`` connects to NATS in the background; :meth:`serve` is the ASGI WebSocket
    endpoint (wrap it in :class:`BridgeEndpoint` for a router).
    """

    def __init__(self, settings: Settings, *, store: LatestStore | None = None) -> None:
        check_serving(settings)
        self.settings = settings
        self.store = store or LatestStore(
            settings.dragonfly_url, timeout_s=settings.api_redis_timeout_seconds, name="sow-ws"
        )
        self._own_store = store is None
        self.batch_s = settings.ws_batch_ms / 1000
        self.stats = BridgeStats()
        self.clients: set[Client] = set()
        self.latest: dict[Key, tuple[int, int, bytes]] = {}
        self.changed: dict[Key, bytes] = {}
        self.configured = configured_keys(settings)
        self.nats_state = "connecting"
        self.nc: NatsClient | None = None
        self.subscribed = asyncio.Event()
        self.started = time.time()
        self._sub: Subscription | None = None
        self._slots = 0  # clients connected or in their handshake
        self._timer: asyncio.TimerHandle | None = None
        self._last_flush = 0.0
        self._turn = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._connecting: asyncio.Task[None] | None = None
        self._inflight: dict[
            tuple[Key, ...], asyncio.Future[tuple[list[tuple[Quote, bytes]], bool]]
        ] = {}
        allowed = settings.ws_allowed_origins
        self._any_origin = "*" in allowed
        self._origins = {o.rstrip("/").lower() for o in allowed}

    # --- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        """Connect to NATS in the background (retrying for ever) and subscribe to quotes."""
        self._loop = asyncio.get_running_loop()
        self._connecting = asyncio.create_task(self._connect(), name="ws-nats")

    async def _connect(self) -> None:
        async def down() -> None:
            self.nats_state = "reconnecting"
            self._broadcast_status()

        async def up() -> None:
            self.nats_state = "connected"
            self.stats.nats_reconnects += 1
            self._broadcast_status()

        self.nc = await connect(
            self.settings.nats_url,
            name="sow-ws",
            on_disconnect=down,
            on_reconnect=up,
            attempts=0,
        )
        self._sub = await self.nc.subscribe(
            QUOTES_WILDCARD,
            cb=self._on_msg,
            pending_msgs_limit=262_144,
            pending_bytes_limit=256 * 1024 * 1024,
        )
        await self.nc.flush()
        self.nats_state = "connected"
        self.subscribed.set()
        self._broadcast_status()
        log.info("ws bridge subscribed", extra=kv(nats=self.settings.nats_url))

    async def stop(self) -> None:
        """Disconnect every client, unsubscribe and close NATS and the Redis reader."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for client in list(self.clients):
            client.killed.set()
        if self._connecting is not None and not self._connecting.done():
            self._connecting.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._connecting
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.nc.close(), 1.0)
        self.nats_state = "stopped"
        if self._own_store:
            await self.store.close()

    # --- NATS -> changed ---------------------------------------------------------------------
    async def _on_msg(self, msg: Msg) -> None:
        self.on_payload(msg.data)

    def on_payload(self, data: bytes) -> None:
        """One Quote JSON from NATS (public so that ``sow up`` could feed quotes in-process)."""
        try:
            quote = decode_quote(data)
            wire = wire_quote(quote)
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError):
            self.stats.invalid_in += 1
            return
        self.on_quote(quote, wire)

    def on_quote(self, quote: Quote, wire: bytes) -> None:
        key = (quote.market, quote.symbol)
        ts, seq = _order(quote.ts, quote.seq)
        known = self.latest.get(key)
        if known is not None:
            if (known[0], known[1]) > (ts, seq):
                self.stats.stale_in += 1
                return
        elif len(self.latest) >= MAX_STREAMS:
            self.stats.invalid_in += 1
            return
        self.latest[key] = (ts, seq, wire)
        changed = self.changed
        if key in changed:
            self.stats.coalesced += 1
        changed[key] = wire
        self.stats.quotes_in += 1
        if self._timer is None:
            self._schedule()

    # --- fan-out -----------------------------------------------------------------------------
    def _schedule(self) -> None:
        loop = self._loop or asyncio.get_running_loop()
        self._loop = loop
        delay = max(0.0, self._last_flush + self.batch_s - loop.time())
        self._timer = loop.call_later(delay, self._flush)

    def _flush(self) -> None:
        self._timer = None
        loop = self._loop
        assert loop is not None
        now = self._last_flush = loop.time()
        changed = self.changed
        self.changed = {}
        behind = False
        started = time.perf_counter()
        try:
            behind = self._fan_out(changed, now)
            took = time.perf_counter() - started
            self.stats.fanout_seconds += took
            self.stats.fanout_ms_last = round(took * 1000, 3)
        except Exception as exc:  # pragma: no cover - a bug must not stop the fan-out for good
            self.stats.errors += 1
            log.exception("ws fan-out failed", extra=kv(error=repr(exc)))
        if behind and self._timer is None:
            self._schedule()

    def _fan_out(self, changed: dict[Key, bytes], now: float) -> bool:
        """Send ``changed`` to every client; True when a client is behind (retry next tick)."""
        stats = self.stats
        if changed:
            stats.batches += 1
        shared: dict[tuple[bool, frozenset[str], frozenset[str]], tuple[bytes, int] | None] = {}
        slow_s = self.settings.ws_slow_client_seconds
        behind = False
        clients = list(self.clients)
        if clients:  # a different client goes first each batch: nobody is always served last
            self._turn = (self._turn + 1) % len(clients)
            clients = clients[self._turn :] + clients[: self._turn]
        for client in clients:
            if not client.active or client.sink.closed:
                continue
            pending = client.pending
            if pending is not None:
                for key, wire in changed.items():
                    if client.wants(key):
                        if key in pending:
                            stats.conflated += 1
                        pending[key] = wire
                if client.sink.ready():
                    client.pending = None
                    if pending:
                        self._send_quotes(
                            client, _message(b"quotes", pending.values()), len(pending)
                        )
                elif now - client.behind_since > slow_s:
                    self._drop(client, "slow")
                else:
                    behind = True
                continue
            if not changed:
                continue
            if client.subkey in shared:
                entry = shared[client.subkey]
            else:
                wires = [w for k, w in changed.items() if client.wants(k)]
                entry = shared[client.subkey] = (
                    (_message(b"quotes", wires), len(wires)) if wires else None
                )
            if entry is None:
                continue
            if client.sink.ready():
                self._send_quotes(client, entry[0], entry[1])
            else:
                client.pending = {k: w for k, w in changed.items() if client.wants(k)}
                client.behind_since = now
                stats.behind += 1
                behind = True
        return behind

    def _send_quotes(self, client: Client, data: bytes, count: int) -> None:
        client.sink.send(data)
        stats = self.stats
        stats.messages_out += 1
        stats.quotes_out += count
        stats.bytes_out += len(data)

    def _send(self, client: Client, doc: dict[str, Any]) -> None:
        data = orjson.dumps(doc)
        client.sink.send(data)
        self.stats.messages_out += 1
        self.stats.bytes_out += len(data)

    def _drop(self, client: Client, kind: str) -> None:
        client.kind = kind
        if kind == "slow":
            self.stats.dropped_slow += 1
            log.warning(
                "ws client disconnected: it stayed behind",
                extra=kv(client=client.id, peer=client.peer,
                         seconds=self.settings.ws_slow_client_seconds),
            )  # fmt: skip
            client.sink.abort()
        client.killed.set()

    def status_message(self) -> dict[str, Any]:
        return {
            "type": "status",
            "nats": self.nats_state,
            "batch_ms": self.settings.ws_batch_ms,
            "server": f"sow {__version__}",
        }

    def _broadcast_status(self) -> None:
        doc = self.status_message()
        for client in list(self.clients):
            if not client.sink.closed:
                self._send(client, doc)

    # --- snapshots ---------------------------------------------------------------------------
    def known_keys(self) -> list[Key]:
        """Configured streams plus every stream seen on NATS, sorted by symbol then market."""
        if not self.latest:
            return self.configured
        keys = set(self.configured)
        keys.update(self.latest)
        return sorted(keys, key=_by_symbol)

    async def cached_quotes(self, keys: Sequence[Key]) -> tuple[list[tuple[Quote, bytes]], bool]:
        """Latest (Quote, wire bytes) from Dragonfly/Redis (one MGET shared by concurrent callers
        asking for the same keys); ``([], False)`` when the cache is down."""
        wanted = tuple(keys)
        fut = self._inflight.get(wanted)
        if fut is None:
            fut = asyncio.ensure_future(self._read_cache(wanted))
            self._inflight[wanted] = fut
            fut.add_done_callback(lambda _f: self._inflight.pop(wanted, None))
        return await asyncio.shield(fut)

    async def _read_cache(self, keys: Sequence[Key]) -> tuple[list[tuple[Quote, bytes]], bool]:
        try:
            return await self.store.entries(keys), True
        except CacheUnavailable:
            return [], False

    def _snapshot(
        self, keys: Sequence[Key], cached: list[tuple[Quote, bytes]]
    ) -> list[tuple[Key, bytes]]:
        """Per key the newer of the cached quote and the last one seen on NATS."""
        best: dict[Key, tuple[int, int, bytes]] = {
            (q.market, q.symbol): (*_order(q.ts, q.seq), wire) for q, wire in cached
        }
        out = []
        for key in keys:
            mine = self.latest.get(key)
            theirs = best.get(key)
            if mine is not None and (theirs is None or mine[:2] >= theirs[:2]):
                out.append((key, mine[2]))
            elif theirs is not None:
                out.append((key, theirs[2]))
        return out

    # --- the ASGI endpoint -------------------------------------------------------------------
    def origin_allowed(self, origin: str | None, host: str | None, scheme: str) -> bool:
        if origin is None or self._any_origin:
            return True
        norm = origin.rstrip("/").lower()
        if norm in self._origins:
            return True
        parts = urlsplit(norm)  # the server's own origin (a page it serves, e.g. /market)
        own = "https" if scheme == "wss" else "http"
        return bool(host) and parts.netloc == (host or "").lower() and parts.scheme == own

    async def serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The ASGI application of one WebSocket connection."""
        if (await receive())["type"] != "websocket.connect":
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers", ())}
        origin = headers.get("origin")
        if not self.origin_allowed(origin, headers.get("host"), scope.get("scheme", "ws")):
            self.stats.refused_origin += 1
            await _deny(scope, send, 403, "forbidden_origin", f"origin {origin!r} is not allowed")
            return
        if self._slots >= self.settings.ws_max_clients:
            self.stats.refused_full += 1
            await _deny(
                scope, send, 503, "too_many_clients",
                f"this server takes at most {self.settings.ws_max_clients} WebSocket clients",
            )  # fmt: skip
            return
        self._slots += 1
        client: Client | None = None
        try:
            await send({"type": "websocket.accept"})
            limit = self.settings.ws_client_queue_bytes
            channel = scope.get("extensions", {}).get(DIRECT_EXTENSION)
            sink: Sink = (
                DirectSink(channel, limit)
                if isinstance(channel, DirectChannel)
                else AsgiSink(send, limit)
            )
            peer = ":".join(map(str, scope.get("client") or ("?",)))
            client = Client(sink, peer)
            self.clients.add(client)
            self.stats.connects += 1
            self.stats.clients_peak = max(self.stats.clients_peak, len(self.clients))
            self._send(client, self.status_message())
            if not await self._session(client, receive):
                await self._close(client, send)
        finally:
            self._slots -= 1
            if client is not None:
                self.clients.discard(client)
                if isinstance(client.sink, AsgiSink):
                    client.sink.abort()

    async def _close(self, client: Client, send: Send) -> None:
        """Close a connection the server ends (abuse: 1008; shutdown: 1001)."""
        if client.kind == "slow":
            return  # aborted already: it was not reading
        code, reason = (1008, "too many invalid messages") if client.kind == "abuse" else (1001, "")
        try:
            await asyncio.wait_for(
                send({"type": "websocket.close", "code": code, "reason": reason}), 2.0
            )
        except Exception:  # gone, or not reading: drop it
            client.sink.abort()

    async def _session(self, client: Client, receive: Receive) -> bool:
        """Handle the client's messages; True when the client left, False when the server ends
        the connection (abuse, too slow, shutting down)."""
        killed = asyncio.ensure_future(client.killed.wait())
        try:
            while True:
                incoming = asyncio.ensure_future(receive())
                done, _ = await asyncio.wait(
                    {incoming, killed}, return_when=asyncio.FIRST_COMPLETED
                )
                if incoming not in done:
                    incoming.cancel()
                    return False
                message = incoming.result()
                if message["type"] != "websocket.receive":
                    return True
                await self._on_client_message(client, message)
                if client.invalid >= self.settings.ws_max_invalid_messages:
                    client.kind = "abuse"
                    self.stats.dropped_abuse += 1
                    log.warning(
                        "ws client closed: too many invalid messages",
                        extra=kv(client=client.id, peer=client.peer, invalid=client.invalid),
                    )
                    return False
        finally:
            killed.cancel()

    def _reject(self, client: Client, detail: str, error: str = "bad_request") -> None:
        client.invalid += 1
        self.stats.invalid_messages += 1
        self._send(client, {"type": "error", "error": error, "detail": detail})

    async def _on_client_message(self, client: Client, message: Message) -> None:
        text = message.get("text")
        if text is None:
            self._reject(client, "binary messages are not supported: send JSON text")
            return
        wait = client.bucket.take()
        if wait:
            self._reject(
                client,
                f"too many messages: at most {CLIENT_MESSAGES_PER_S:g} per second "
                f"(retry in {wait:.1f}s)",
                "rate_limited",
            )
            return
        try:
            doc = orjson.loads(text)
        except orjson.JSONDecodeError:
            self._reject(client, "not JSON; send e.g. " + EXAMPLE)
            return
        if not isinstance(doc, dict):
            self._reject(client, "expected a JSON object, e.g. " + EXAMPLE)
            return
        kind = doc.get("type")
        try:
            if kind == "subscribe":
                await self._subscribe(client, _symbols(doc, self.settings.ws_max_symbols))
            elif kind == "unsubscribe":
                self._unsubscribe(client, _symbols(doc, self.settings.ws_max_symbols))
            elif kind == "ping":
                pong: dict[str, Any] = {"type": "pong", "ts": int(time.time() * 1000)}
                if isinstance(doc.get("id"), str | int) and not isinstance(doc.get("id"), bool):
                    pong["id"] = doc["id"]
                self._send(client, pong)
            else:
                shown = kind if isinstance(kind, str) else orjson.dumps(kind).decode()
                self._reject(
                    client, f"unknown type {shown[:40]!r}: expected subscribe, unsubscribe or ping"
                )
        except UsageError as exc:
            self._reject(client, str(exc))

    async def _subscribe(self, client: Client, symbols: list[str]) -> None:
        everything = "*" in symbols
        names = [s for s in symbols if s != "*"]
        after = client.symbols | set(names)
        if len(after) > self.settings.ws_max_symbols:
            raise UsageError(
                f"symbols: at most {self.settings.ws_max_symbols} per connection "
                f'(or subscribe to "*")'
            )
        if everything:
            keys = self.known_keys()
        else:
            keys = [(m, s) for s in sorted(set(names)) for m in ALL_MARKETS]
        cached, cache_ok = await self.cached_quotes(keys)
        # From here to the send nothing awaits: a quote arriving later is in the next batch.
        if client.sink.closed:
            return
        if everything:
            client.all = True
            client.excluded.clear()
        else:
            client.symbols.update(names)
            client.excluded.difference_update(names)
        client.resubscribed()
        snapshot = self._snapshot(keys, cached)
        self.stats.snapshots += 1
        if client.pending is not None or not client.sink.ready():
            # Behind already: the snapshot joins its conflated backlog.
            if client.pending is None:
                client.pending = {}
                client.behind_since = asyncio.get_running_loop().time()
                self.stats.behind += 1
            client.pending.update(snapshot)
            if self._timer is None:
                self._schedule()
            return
        extra = (
            b',"symbols":'
            + orjson.dumps(symbols)
            + (b',"cache":true' if cache_ok else b',"cache":false')
        )
        wires = [wire for _key, wire in snapshot]
        self._send_quotes(client, _message(b"snapshot", wires, extra), len(wires))

    def _unsubscribe(self, client: Client, symbols: list[str]) -> None:
        if "*" in symbols:
            client.all = False
            client.symbols.clear()
            client.excluded.clear()
        else:
            for symbol in symbols:
                client.symbols.discard(symbol)
                if client.all:
                    if len(client.excluded) >= self.settings.ws_max_symbols:
                        raise UsageError(
                            f"symbols: at most {self.settings.ws_max_symbols} exclusions"
                        )
                    client.excluded.add(symbol)
        client.resubscribed()
        self._send(client, {"type": "unsubscribed", "symbols": symbols})

    # --- status and metrics ------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """Counters for heartbeats and /health."""
        doc: dict[str, Any] = asdict(self.stats)
        doc.update(
            clients=len(self.clients),
            clients_behind=sum(1 for c in self.clients if c.pending is not None),
            streams=len(self.latest),
            nats=self.nats_state,
            nats_connected=self.nc is not None and self.nc.is_connected,
            nats_pending=self._sub.pending_msgs if self._sub is not None else 0,
            nats_dropped=dropped_by_client(self.nc),
            redis_connected=self.store.connected,
            dropped=self.stats.dropped_slow + self.stats.dropped_abuse,
        )
        return doc

    def collect(self) -> Iterable[Metric]:
        """Prometheus metrics computed from the counters at scrape time."""
        s = self.stats
        yield GaugeMetricFamily("sow_ws_clients", "Connected WebSocket clients", len(self.clients))
        yield GaugeMetricFamily(
            "sow_ws_clients_behind",
            "WebSocket clients whose updates are being conflated (slow readers)",
            sum(1 for c in self.clients if c.pending is not None),
        )
        yield GaugeMetricFamily(
            "sow_nats_connected", "1 when the NATS connection is up", self.nats_state == "connected"
        )
        counters = (
            ("sow_quotes_seen", "Quotes received from NATS", s.quotes_in),
            ("sow_quotes_invalid", "NATS payloads that are not a Quote", s.invalid_in),
            ("sow_ws_quotes_out", "Quotes sent to WebSocket clients", s.quotes_out),
            ("sow_ws_messages_out", "Messages sent to WebSocket clients", s.messages_out),
            ("sow_ws_bytes_out", "Bytes sent to WebSocket clients (before compression)",
             s.bytes_out),
            ("sow_ws_batches", "Conflated batches fanned out", s.batches),
            ("sow_ws_fanout_seconds", "Time spent writing batches to every client",
             s.fanout_seconds),
            ("sow_ws_coalesced", "Quotes replaced by a newer one within a batch window",
             s.coalesced),
            ("sow_ws_conflated", "Queued quotes replaced by newer ones for slow clients",
             s.conflated),
            ("sow_ws_invalid_messages", "Invalid messages received from clients",
             s.invalid_messages),
            ("sow_ws_connects", "WebSocket connections accepted", s.connects),
        )  # fmt: skip
        for name, doc, value in counters:
            yield CounterMetricFamily(name, doc, value)
        dropped = CounterMetricFamily(
            "sow_ws_clients_dropped", "Clients disconnected by the server", labels=("reason",)
        )
        dropped.add_metric(("slow",), s.dropped_slow)
        dropped.add_metric(("abuse",), s.dropped_abuse)
        yield dropped
        refused = CounterMetricFamily(
            "sow_ws_refused", "WebSocket handshakes refused", labels=("reason",)
        )
        refused.add_metric(("origin",), s.refused_origin)
        refused.add_metric(("full",), s.refused_full)
        yield refused

    async def publish_status(self, component: str, doc: dict[str, Any]) -> None:
        """Publish a heartbeat on ``sow.status.{component}`` (skipped while NATS is down)."""
        nc = self.nc
        if nc is not None and nc.is_connected:
            with contextlib.suppress(Exception):
                await nc.publish(status_subject(component), orjson.dumps(doc))

    async def nats_rtt_ms(self, timeout_s: float = HEALTH_TIMEOUT_S) -> float:
        """Round trip to the NATS server in ms; UpstreamError when not connected."""
        nc = self.nc
        if nc is None or not nc.is_connected:
            raise UpstreamError(f"NATS at {self.settings.nats_url}: {self.nats_state}")
        started = time.perf_counter()
        try:
            await asyncio.wait_for(nc.flush(timeout=max(1, round(timeout_s))), timeout_s)
        except Exception as exc:
            raise UpstreamError(f"NATS at {self.settings.nats_url}: no answer ({exc!r})") from None
        return (time.perf_counter() - started) * 1000


EXAMPLE = '{"type":"subscribe","symbols":["BTCUSDT"]}'


def _symbols(doc: dict[str, Any], most: int) -> list[str]:
    raw = doc.get("symbols")
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, list) or not raw:
        raise UsageError('symbols: expected a non-empty list, e.g. ["BTCUSDT"] or ["*"]')
    if len(raw) > most:
        raise UsageError(f"symbols: at most {most} per message")
    out: list[str] = []
    for item in raw:
        if item == "*":
            out.append("*")
            continue
        if not isinstance(item, str):
            raise UsageError(f"symbols: {orjson.dumps(item).decode()[:40]} is not a string")
        norm = item.strip().upper()
        if not SYMBOL_RE.match(norm):
            raise UsageError(
                f"symbol {item[:40]!r}: not a valid symbol (2-30 letters and digits, e.g. BTCUSDT)"
            )
        if norm not in out:
            out.append(norm)
    return out


async def _deny(scope: Scope, send: Send, status: int, error: str, detail: str) -> None:
    """Refuse a WebSocket handshake with an HTTP status and a JSON body (403 where the server
    cannot send a body)."""
    if "websocket.http.response" in scope.get("extensions", {}):
        body = orjson.dumps({"error": error, "detail": detail})
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
        if status == 503:
            headers.append((b"retry-after", b"5"))
        await send({"type": "websocket.http.response.start", "status": status, "headers": headers})
        await send({"type": "websocket.http.response.body", "body": body})
    else:
        await send({"type": "websocket.close", "code": 1008, "reason": error})


class BridgeEndpoint:
    """The bridge as a plain ASGI app (Starlette treats a non-function endpoint as one)."""

    def __init__(self, bridge: Bridge) -> None:
        self.bridge = bridge

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.bridge.serve(scope, receive, send)


# --- health --------------------------------------------------------------------------------


async def bounded(work: Awaitable[T], timeout_s: float) -> T:
    """``await work``, raising TimeoutError after ``timeout_s`` *without* waiting for ``work`` to
    unwind: it is cancelled in the background. (psycopg answers a cancellation by asking the
    server to cancel the query and waiting up to 10 s for it; a frozen server must not turn a
    1 s timeout into 11 s.)"""
    task = asyncio.ensure_future(work)
    try:
        return await asyncio.wait_for(asyncio.shield(task), timeout_s)
    except BaseException:
        if not task.done():
            task.cancel()
            task.add_done_callback(_consume)
        raise


def _consume(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()  # retrieved: no "exception was never retrieved" warning


@dataclass(slots=True)
class Check:
    """One dependency's health: ``state`` up/down, round trip, what failed."""

    state: str
    latency_ms: float | None = None
    detail: str = ""
    required: bool = True

    def doc(self) -> dict[str, Any]:
        out: dict[str, Any] = {"state": self.state, "required": self.required}
        out["latency_ms"] = None if self.latency_ms is None else round(self.latency_ms, 3)
        if self.detail:
            out["detail"] = self.detail
        return out


async def probe(
    name: str, call: Callable[[], Awaitable[float]], required: Collection[str]
) -> tuple[str, Check]:
    """Run one health probe (returning its latency in ms) into a :class:`Check`."""
    try:
        latency = await bounded(call(), HEALTH_TIMEOUT_S * 2)
    except (UpstreamError, TimeoutError, OSError) as exc:
        why = str(exc) or "no answer in time"
        return name, Check("down", None, why, name in required)
    return name, Check("up", latency, "", name in required)


def health_answer(checks: dict[str, Check], extra: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """(HTTP status, body) of /health: 503 naming every required dependency that is down."""
    down = [n for n, c in checks.items() if c.state != "up" and c.required]
    degraded = [n for n, c in checks.items() if c.state != "up" and not c.required]
    status = "down" if down else "degraded" if degraded else "ok"
    doc: dict[str, Any] = {
        "status": status,
        "dependencies": {n: c.doc() for n, c in checks.items()},
        **extra,
    }
    if down:
        doc["error"] = "unavailable"
        doc["detail"] = "; ".join(f"{n} is down: {checks[n].detail}" for n in down)
        return 503, doc
    return 200, doc


# --- serving -------------------------------------------------------------------------------


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield  # sow's runtime (run_until_signal) owns SIGINT/SIGTERM


MAX_HEAD_BYTES = 32 * 1024
"""Most bytes of a request line plus headers (httptools itself accepts any size)."""


def _http_impl() -> type[asyncio.Protocol] | str:
    """uvicorn's httptools protocol with a bound on request heads; h11 (bounded by
    ``h11_max_incomplete_event_size``) when httptools is missing."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:  # pragma: no cover - httptools is a dependency
        return "h11"

    class BoundedHttpToolsProtocol(HttpToolsProtocol):
        _in_head = True
        _head_bytes = 0

        def data_received(self, data: bytes) -> None:
            if self._in_head:
                self._head_bytes += len(data)
                if self._head_bytes > MAX_HEAD_BYTES:
                    body = orjson.dumps({
                        "error": "too_large",
                        "detail": f"request line and headers are limited to {MAX_HEAD_BYTES} bytes",
                    })  # fmt: skip
                    self.transport.write(
                        b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
                        b"content-type: application/json\r\nconnection: close\r\n"
                        b"content-length: %d\r\n\r\n%b" % (len(body), body)
                    )
                    self.transport.close()
                    return
            super().data_received(data)

        def on_headers_complete(self) -> None:
            self._in_head = False
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            self._in_head = True
            self._head_bytes = 0
            super().on_message_complete()

    return BoundedHttpToolsProtocol


async def serve_asgi(
    app: Callable[[Scope, Receive, Send], Awaitable[None]],
    sock: socket.socket,
    settings: Settings,
    stop: asyncio.Event,
) -> None:
    """Serve ``app`` on ``sock`` with uvicorn (HTTP and :class:`BridgeWebSocketProtocol`) until
    ``stop`` is set; open connections get ``timeout_graceful_shutdown`` to finish."""
    config = uvicorn.Config(
        app,
        http=_http_impl(),
        ws=BridgeWebSocketProtocol,
        ws_max_size=settings.ws_max_message_bytes,
        ws_ping_interval=settings.ws_ping_interval_seconds,
        ws_ping_timeout=settings.ws_ping_timeout_seconds,
        ws_per_message_deflate=True,
        lifespan="off",
        log_config=None,
        access_log=False,
        server_header=False,
        proxy_headers=True,
        forwarded_allow_ips=list(settings.api_trusted_proxies),
        h11_max_incomplete_event_size=16 * 1024,
        timeout_keep_alive=5,
        timeout_graceful_shutdown=5,
    )
    server = _Server(config)

    async def watch() -> None:
        await stop.wait()
        server.should_exit = True

    watcher = asyncio.create_task(watch(), name="serve-stop")
    try:
        await server.serve(sockets=[sock])
    finally:
        watcher.cancel()
        sock.close()


async def heartbeat(
    bridge: Bridge, component: str, status: Callable[[], dict[str, Any]], interval_s: float
) -> None:
    """Publish ``status()`` on ``sow.status.{component}`` every ``interval_s``."""
    while True:
        await asyncio.sleep(interval_s)
        await bridge.publish_status(component, status())


# --- sow serve-ws --------------------------------------------------------------------------


class WsServer:
    """The running ``sow serve-ws``: the bridge alone at ``/ws`` and ``/``, plus ``/health``
    (NATS, Redis) and ``/metrics``; heartbeats on ``sow.status.ws``."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.bridge = Bridge(settings)
        self.metrics = ServerMetrics()
        self.metrics.register(self.bridge.collect)
        self.instance = instance_id()
        self.state = "starting"
        endpoint = BridgeEndpoint(self.bridge)
        self.app = Starlette(
            routes=[
                WebSocketRoute("/ws", endpoint),
                WebSocketRoute("/", endpoint),
                Route("/", self._index),
                Route("/health", self._health),
                Route("/metrics", self._metrics),
            ]
        )
        self.port: int | None = None

    def status(self) -> dict[str, Any]:
        """The heartbeat document published on ``sow.status.ws``."""
        return {
            "component": "ws",
            "instance": self.instance,
            "state": self.state,
            "since": self.bridge.started,
            "ts": time.time(),
            "port": self.port,
            **self.bridge.status(),
        }

    async def _index(self, request: Request) -> Response:
        doc = {"name": "sow serve-ws", "version": __version__, "websocket": "/ws",
               "health": "/health", "metrics": "/metrics"}  # fmt: skip
        return Response(orjson.dumps(doc), media_type="application/json")

    async def _health(self, request: Request) -> Response:
        required = set(self.settings.api_health_required)
        checks = dict(
            await asyncio.gather(
                probe("nats", self.bridge.nats_rtt_ms, required),
                probe("redis", self.bridge.store.ping, required),
            )
        )
        status, doc = health_answer(
            checks, {"component": "ws", "clients": len(self.bridge.clients)}
        )
        return Response(orjson.dumps(doc), status, media_type="application/json")

    async def _metrics(self, request: Request) -> Response:
        return Response(self.metrics.render(), media_type=CONTENT_TYPE)

    async def run(
        self, stop: asyncio.Event | None = None, *, sock: socket.socket | None = None
    ) -> None:
        """Serve until ``stop`` is set (``sock``: an already bound socket, e.g. for tests)."""
        stop = stop or asyncio.Event()
        s = self.settings
        sock = sock or bind_socket(s.ws_host, s.ws_port, what="sow serve-ws")
        self.port = sock.getsockname()[1]
        await self.bridge.start()
        self.state = "running"
        beat = asyncio.create_task(
            heartbeat(self.bridge, "ws", self.status, s.heartbeat_interval_seconds),
            name="ws-heartbeat",
        )
        log.info("serve-ws listening", extra=kv(url=f"ws://{s.ws_host}:{self.port}/ws"))
        try:
            await serve_asgi(self.app, sock, s, stop)
        finally:
            self.state = "stopped"
            beat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beat
            await self.bridge.publish_status("ws", self.status())
            await self.bridge.stop()


async def run_ws(settings: Settings, stop: asyncio.Event | None = None) -> WsServer:
    """Run ``sow serve-ws`` until ``stop`` is set; returns the server for its counters."""
    server = WsServer(settings)
    await server.run(stop)
    return server


__all__ = [
    "DIRECT_EXTENSION",
    "Bridge",
    "BridgeEndpoint",
    "BridgeStats",
    "BridgeWebSocketProtocol",
    "CacheUnavailable",
    "Check",
    "LatestStore",
    "SharedDeflate",
    "SharedDeflateFactory",
    "WsServer",
    "bind_socket",
    "bounded",
    "check_serving",
    "configured_keys",
    "health_answer",
    "iso_ms",
    "probe",
    "run_ws",
    "serve_asgi",
    "wire_quote",
]
