"""The ``cache`` stage: Quotes -> Dragonfly/Redis hot state (latest, history, timeseries, stats).

Keys (market in lower case, symbol as in the Quote; see ARCHITECTURE.md):

=====================================  ==========================================================
``latest:{market}:{symbol}``           the newest Quote JSON by exchange time (``ts``, then
                                       ``seq``); an older quote arriving late never replaces it
``history:{market}:{symbol}``          list of Quote JSON, newest first, capped at
                                       ``cache_history_max`` (LPUSH + LTRIM)
``timeseries:{market}:{symbol}:{day}`` sorted set, member Quote JSON, score ``ts`` (ms); ``day``
                                       is the UTC date of ``ts``
``stats:{market}:{symbol}:{day}``      hash: ``count``, ``sum``, ``min``, ``max``, ``first``,
                                       ``first_ts``, ``last``, ``last_ts`` of the price that day
=====================================  ==========================================================

Every key is bounded: ``latest`` is one per stream, ``history`` is capped, ``timeseries`` and
``stats`` get ``EXPIRE cache_timeseries_days × 86400`` on every write (a day's keys therefore live
that long after the day's last quote, so a replay of an old recording is kept too).

How writes are made, and why:

- **Coalesced and pipelined.** :meth:`CacheWriter.add` only appends to a bounded buffer. One task
  flushes it ``cache_flush_ms`` after the first buffered quote (at once when
  :data:`BATCH_MAX` quotes are waiting), as one non-transactional pipeline written to the socket
  in one go: per stream one ``LPUSH`` with every quote of the flush and one ``LTRIM``; per stream
  and day one ``ZADD`` with every quote and one ``EXPIRE``; one ``EVAL`` for all ``latest`` keys
  (only the newest quote per key) and one ``EVAL`` for all ``stats`` keys (pre-aggregated per
  key). Within a flush quotes are ordered by ``(ts, seq)`` so history stays in exchange order.
  The commands are packed here (:class:`RespBatch`) and sent over a redis-py pooled connection:
  redis-py's pure-Python packer was more than half of the writer's CPU time.
- **Lua for ``latest`` and ``stats``.** Several ``sow cache`` processes share ``quotes.>`` through
  a NATS queue group, so two processes can write the same key in any order; a client-side
  "read, compare, write" would race. A script compares the stored quote's ``ts``/``seq`` with the
  new one and writes only if newer, atomically on the server, in the same round trip as the rest
  of the pipeline (``WATCH``/``MULTI`` would cost a round trip per key and retries under
  contention). ``stats`` merges min/max/first/last the same way, and ``HINCRBY`` keeps ``count``.
  Scripts are sent with ``EVAL`` (not ``EVALSHA``) so a restarted server, whose script cache is
  empty, needs no reload step.
- **Outages.** A connection error fails the flush, and so does a reply where the server refused
  every data command (OOM, NOAUTH, READONLY: nothing was stored): the batch goes back to the
  front of the buffer, the writer waits (jittered backoff up to 2 s) and retries, for ever. While Redis is away the
  buffer holds at most ``buffer_max`` quotes; beyond that the oldest are dropped and counted
  (``dropped``). Failed flush attempts and commands the server refused are counted
  (``write_errors``). ``latest`` and ``timeseries`` writes are idempotent; if a connection breaks
  after the server applied part of a pipeline and the server survives (a network cut, not a
  restart), the retry can add that one batch to ``history`` and ``stats.count`` twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import msgspec
import orjson
import redis.asyncio as aioredis
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from sowcli.bus.nats import (
    QUOTES_WILDCARD,
    connect,
    dropped_by_client,
    instance_id,
    status_subject,
)
from sowcli.config import SYMBOL_RE, Settings, redis_url
from sowcli.errors import ConfigError
from sowcli.logs import kv
from sowcli.model import Quote, decode_quote, encode_quote

log = logging.getLogger("sow.cache")

COMPONENT = "cache"
DAY_MS = 86_400_000
BATCH_MAX = 5_000  # quotes per pipeline: a full batch is flushed without waiting for the window
BUFFER_MAX = 200_000  # quotes held while Redis is unreachable (about 80 MB); oldest dropped beyond
BACKOFF_CAP_S = 2.0
# What nats-py may hold for us before it drops messages as a slow consumer.
NATS_PENDING_MAX = 262_144
NATS_PENDING_BYTES_MAX = 128 * 1024 * 1024

# KEYS: latest keys. ARGV: per key ts, seq (-1 = none), Quote JSON. Returns how many were written.
LATEST_LUA = """
local written = 0
for i, key in ipairs(KEYS) do
  local b = 3 * (i - 1)
  local ts = tonumber(ARGV[b + 1])
  local seq = tonumber(ARGV[b + 2])
  local newer = true
  local cur = redis.call('GET', key)
  if cur then
    local cts = tonumber(string.match(cur, '"ts":%s*(%-?%d+)'))
    if cts then
      if cts > ts then
        newer = false
      elseif cts == ts then
        local cseq = tonumber(string.match(cur, '"seq":%s*(%-?%d+)')) or -1
        newer = seq > cseq
      end
    end
  end
  if newer then
    redis.call('SET', key, ARGV[b + 3])
    written = written + 1
  end
end
return written
"""

# KEYS: stats keys. ARGV[1]: TTL seconds; then per key count, sum, min, max, first_ts, first,
# last_ts, last (of the quotes in this flush). Merged with what the hash holds, atomically.
STATS_LUA = """
local ttl = ARGV[1]
for i, key in ipairs(KEYS) do
  local b = 1 + 8 * (i - 1)
  redis.call('HINCRBY', key, 'count', ARGV[b + 1])
  redis.call('HINCRBYFLOAT', key, 'sum', ARGV[b + 2])
  local cur = redis.call('HMGET', key, 'min', 'max', 'first_ts', 'last_ts')
  if not cur[1] or tonumber(ARGV[b + 3]) < tonumber(cur[1]) then
    redis.call('HSET', key, 'min', ARGV[b + 3])
  end
  if not cur[2] or tonumber(ARGV[b + 4]) > tonumber(cur[2]) then
    redis.call('HSET', key, 'max', ARGV[b + 4])
  end
  if not cur[3] or tonumber(ARGV[b + 5]) < tonumber(cur[3]) then
    redis.call('HSET', key, 'first_ts', ARGV[b + 5], 'first', ARGV[b + 6])
  end
  if not cur[4] or tonumber(ARGV[b + 7]) >= tonumber(cur[4]) then
    redis.call('HSET', key, 'last_ts', ARGV[b + 7], 'last', ARGV[b + 8])
  end
  redis.call('EXPIRE', key, ttl)
end
return #KEYS
"""


def stream_key(market: str, symbol: str) -> str:
    """``("SPOT", "BTCUSDT")`` -> ``spot:BTCUSDT`` (the part every cache key shares)."""
    return f"{market.lower()}:{symbol}"


def latest_key(market: str, symbol: str) -> str:
    return f"latest:{stream_key(market, symbol)}"


def history_key(market: str, symbol: str) -> str:
    return f"history:{stream_key(market, symbol)}"


def day_of(ts_ms: int) -> str:
    """The UTC date of an exchange timestamp, ``YYYY-MM-DD``."""
    return datetime.fromtimestamp(ts_ms // DAY_MS * 86_400, tz=UTC).strftime("%Y-%m-%d")


def timeseries_key(market: str, symbol: str, ts_ms: int) -> str:
    return f"timeseries:{stream_key(market, symbol)}:{day_of(ts_ms)}"


def stats_key(market: str, symbol: str, ts_ms: int) -> str:
    return f"stats:{stream_key(market, symbol)}:{day_of(ts_ms)}"


def _order(q: Quote) -> tuple[int, int]:
    return (q.ts, -1 if q.seq is None else q.seq)


def _bulk(value: bytes | str | int | float) -> bytes:
    """One RESP bulk string (floats as their shortest round-trip repr, like redis-py)."""
    if isinstance(value, bytes):
        data = value
    elif isinstance(value, str):
        data = value.encode()
    elif isinstance(value, float):
        data = repr(value).encode()
    else:
        data = b"%d" % value
    return b"$%d\r\n%b\r\n" % (len(data), data)


class RespBatch:
    """Commands of one flush, packed in the Redis protocol, ready for one socket write."""

    __slots__ = ("chunks", "count", "data")

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.count = 0
        self.data: list[int] = []  # indices of the commands that store quotes

    def command(self, *args: bytes | str | int | float, data: bool = False) -> None:
        self.chunks.append(b"*%d\r\n" % len(args) + b"".join(map(_bulk, args)))
        if data:
            self.data.append(self.count)
        self.count += 1

    def values(self, name: str, key: str, values: list[bytes]) -> None:
        """``NAME key v1 v2 ...`` (LPUSH with many values)."""
        head = b"*%d\r\n" % (len(values) + 2) + _bulk(name) + _bulk(key)
        body = b"".join([b"$%d\r\n%b\r\n" % (len(v), v) for v in values])
        self.chunks.append(head + body)
        self.data.append(self.count)
        self.count += 1

    def scored(self, name: str, key: str, scores: list[int], members: list[bytes]) -> None:
        """``NAME key s1 m1 s2 m2 ...`` (ZADD with many members, integer scores)."""
        head = b"*%d\r\n" % (2 * len(members) + 2) + _bulk(name) + _bulk(key)
        parts = []
        for score, member in zip(scores, members, strict=True):
            text = b"%d" % score
            parts.append(b"$%d\r\n%b\r\n$%d\r\n%b\r\n" % (len(text), text, len(member), member))
        body = b"".join(parts)
        self.chunks.append(head + body)
        self.data.append(self.count)
        self.count += 1


@dataclass(slots=True)
class CacheStats:
    """Counters of a :class:`CacheWriter` (all since start)."""

    quotes_in: int = 0
    written: int = 0  # quotes whose writes Redis acknowledged
    batches: int = 0  # successful flushes
    last_flush_ms: float | None = None  # round trip of the last successful flush
    dropped: int = 0  # quotes discarded unwritten (buffer full during an outage, or at shutdown)
    write_errors: int = 0  # failed flush attempts plus commands the server refused
    buffered_peak: int = 0


class CacheWriter:
    """The QuoteHandler that keeps Quotes in Dragonfly/Redis (see the module docstring).

    ``on_quote``/``add`` never wait on the network; one task flushes the buffer. Use it directly in
    a process that has the quotes (``sow up``), or through :class:`CacheStage` from NATS.
    """

    def __init__(
        self,
        url: str,
        *,
        history_max: int = 1000,
        timeseries_days: int = 7,
        flush_ms: int = 50,
        batch_max: int = BATCH_MAX,
        buffer_max: int = BUFFER_MAX,
        name: str = "sow-cache",
    ) -> None:
        self.url = redis_url(url)
        self.history_max = history_max
        self.ttl_s = timeseries_days * 86_400
        self.flush_s = flush_ms / 1000
        self.batch_max = batch_max
        self.buffer_max = max(buffer_max, batch_max)
        self.name = name
        self.stats = CacheStats()
        self.connected = False
        try:
            self._redis: aioredis.Redis = aioredis.Redis.from_url(
                self.url,
                socket_connect_timeout=2.0,
                socket_timeout=10.0,
                socket_keepalive=True,
                # Retries are ours (a batch goes back into the buffer): redis-py's own would
                # replay a whole pipeline while we count nothing.
                retry=Retry(NoBackoff(), 0),
                client_name=name,
            )
        except ValueError as exc:
            raise ConfigError(f"dragonfly_url {self.url!r}: {exc}") from None
        self._buffer: deque[Quote] = deque()
        self._oldest_mono = 0.0  # arrival of the oldest quote waiting for the next flush
        self._wake = asyncio.Event()  # the buffer became non-empty
        self._full = asyncio.Event()  # a full batch is waiting
        self._idle = asyncio.Event()  # nothing buffered, nothing in flight
        self._idle.set()
        self._closing = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._in_flight = 0
        self._streams: dict[tuple[str, str], str] = {}
        self._days: dict[int, str] = {}
        self._last_error = ""

    @classmethod
    def from_settings(cls, settings: Settings, **kwargs: Any) -> CacheWriter:
        return cls(
            settings.dragonfly_url,
            history_max=settings.cache_history_max,
            timeseries_days=settings.cache_timeseries_days,
            flush_ms=settings.cache_flush_ms,
            **kwargs,
        )

    @property
    def buffered(self) -> int:
        """Quotes waiting in the buffer (not counting a batch being written)."""
        return len(self._buffer)

    @property
    def pending(self) -> int:
        """Quotes not yet written: buffered plus the batch in flight."""
        return len(self._buffer) + self._in_flight

    # --- QuoteHandler --------------------------------------------------------------------------
    async def start(self) -> None:
        """Start the flush task; an unreachable server is logged, not fatal (writes wait for it)."""
        try:
            await self._redis.ping()
            self._set_connected(True)
        except (RedisError, OSError) as exc:
            self._set_connected(False, exc)
        self._task = asyncio.create_task(self._run(), name="cache-flush")

    async def on_quote(self, quote: Quote) -> None:
        self.add(quote)

    def on_quote_nowait(self, quote: Quote) -> None:
        self.add(quote)

    def add(self, quote: Quote) -> None:
        """Buffer one quote for the next flush; never blocks (drops the oldest beyond the bound)."""
        buf = self._buffer
        self.stats.quotes_in += 1
        if not buf:
            self._oldest_mono = time.monotonic()
            self._idle.clear()
            self._wake.set()
        elif len(buf) >= self.buffer_max:
            buf.popleft()
            self.stats.dropped += 1
        buf.append(quote)
        n = len(buf)
        if n > self.stats.buffered_peak:
            self.stats.buffered_peak = n
        if n == self.batch_max:
            self._full.set()

    async def drained(self, timeout_s: float | None = None) -> bool:
        """Wait until everything buffered has been written (or ``timeout_s``); True if it was."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    async def stop(self, timeout_s: float = 5.0) -> None:
        """Write what is buffered (giving up after ``timeout_s``: the rest counts as dropped)."""
        self._closing.set()
        self._wake.set()
        self._full.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout_s)
            except TimeoutError:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
                self.stats.dropped += self._in_flight  # cancelled mid-write: not known stored
                self._in_flight = 0
        if self._buffer:
            self.stats.dropped += len(self._buffer)
            log.warning(
                "quotes not written to the cache at shutdown",
                extra=kv(count=len(self._buffer), url=self.url, error=self._last_error),
            )
            self._buffer.clear()
        with contextlib.suppress(Exception):
            await self._redis.aclose()

    async def ping(self, timeout_s: float = 1.0) -> bool:
        """Check the server (used by the heartbeat when no flush told us recently)."""
        try:
            await asyncio.wait_for(self._redis.ping(), timeout_s)
        except (RedisError, OSError, TimeoutError) as exc:
            self._set_connected(False, exc)
            return False
        self._set_connected(True)
        return True

    # --- the flush task ------------------------------------------------------------------------
    def _set_connected(
        self,
        up: bool,
        exc: BaseException | None = None,
        message: str = "redis unreachable, will retry",
    ) -> None:
        """``connected`` means "reachable and taking our writes"; log changes once each."""
        if up and not self.connected:
            log.info("redis connected", extra=kv(url=self.url, buffered=len(self._buffer)))
        elif not up:
            err = (str(exc) or type(exc).__name__) if exc is not None else ""
            if self.connected or err != self._last_error:
                log.warning(message, extra=kv(url=self.url, error=err))
            self._last_error = err
        self.connected = up

    async def _run(self) -> None:
        buf = self._buffer
        delay = 0.05
        while True:
            if not buf:
                self._idle.set()
                if self._closing.is_set():
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            if len(buf) < self.batch_max and not self._closing.is_set():
                wait_s = self._oldest_mono + self.flush_s - time.monotonic()
                if wait_s > 0:
                    self._full.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._full.wait(), wait_s)
            n = min(len(buf), self.batch_max)
            batch = [buf.popleft() for _ in range(n)]
            if buf:  # a full batch was taken: the rest has waited long enough
                self._oldest_mono = 0.0
            self._in_flight = n
            try:
                ok = await self._write(batch)
            except Exception as exc:  # a bug must cost this batch, not the stage
                self.stats.write_errors += 1
                self.stats.dropped += n
                log.error("cache flush failed, batch dropped", extra=kv(count=n, error=repr(exc)))
                ok = True
            self._in_flight = 0
            if ok:
                delay = 0.05
                continue
            # Not written: back to the front of the buffer (bounded), then back off and retry.
            room = self.buffer_max - len(buf)
            if room < len(batch):
                lost = len(batch) - max(room, 0)
                self.stats.dropped += lost
                batch = batch[lost:]
            buf.extendleft(reversed(batch))
            self._oldest_mono = 0.0
            if self._closing.is_set():
                return  # stop() gives up on the rest
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), delay * (0.5 + random.random()))
            delay = min(delay * 2, BACKOFF_CAP_S)

    async def _write(self, batch: list[Quote]) -> bool:
        """One pipeline for ``batch``; False when it must be retried.

        Retried: connection errors, and replies where *every* data command (LPUSH, ZADD, EVAL)
        was refused (OOM, NOAUTH, READONLY...): nothing was stored, so a retry duplicates
        nothing. A partly refused batch is not retried; the refused commands count as
        ``write_errors``.
        """
        commands = self._commands(batch)
        started = time.perf_counter()
        try:
            replies = await self._execute(commands)
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            self.stats.write_errors += 1
            self._set_connected(False, exc)
            return False
        except RedisError as exc:  # a client-side fault: retrying the same batch cannot help
            self.stats.write_errors += 1
            self.stats.dropped += len(batch)
            log.error(
                "cache write failed, batch dropped", extra=kv(count=len(batch), error=repr(exc))
            )
            return True
        refused = [r for r in replies if isinstance(r, Exception)]
        if refused and all(isinstance(replies[i], Exception) for i in commands.data):
            self.stats.write_errors += 1
            self._set_connected(False, refused[0], "redis refused the cache writes, will retry")
            return False
        self.stats.last_flush_ms = (time.perf_counter() - started) * 1000
        self._set_connected(True)
        if refused:
            self.stats.write_errors += len(refused)
            log.error(
                "redis refused some cache writes",
                extra=kv(commands=len(refused), of=len(replies), error=str(refused[0])),
            )
        self.stats.written += len(batch)
        self.stats.batches += 1
        return True

    async def _execute(self, commands: RespBatch) -> list[Any]:
        """Send the packed commands in one write, then read every reply (errors as values).

        redis-py's pool gives the connection (URL, auth, TLS, timeouts, reply parser); the
        commands are packed by :class:`RespBatch` because redis-py's pure-Python packer was more
        than half of the writer's CPU time.
        """
        pool = self._redis.connection_pool
        conn = await pool.get_connection()  # type: ignore[no-untyped-call]  # redis-py, untyped
        try:
            await conn.send_packed_command(commands.chunks, check_health=False)
            replies: list[Any] = []
            for _ in range(commands.count):
                try:
                    replies.append(await conn.read_response())
                except ResponseError as exc:
                    replies.append(exc)
        except BaseException:
            # A half-read pipeline leaves the socket out of step: never reuse it.
            await conn.disconnect()
            raise
        finally:
            await pool.release(conn)
        return replies

    def _stream(self, market: str, symbol: str) -> str:
        key = (market, symbol)
        base = self._streams.get(key)
        if base is None:
            if len(self._streams) > 100_000:  # bounded even against a flood of bogus symbols
                self._streams.clear()
            base = self._streams[key] = stream_key(market, symbol)
        return base

    def _day(self, day_number: int) -> str:
        date = self._days.get(day_number)
        if date is None:
            if len(self._days) > 1000:
                self._days.clear()
            date = self._days[day_number] = day_of(day_number * DAY_MS)
        return date

    def _commands(self, batch: list[Quote]) -> RespBatch:
        groups: dict[tuple[str, str], list[Quote]] = {}
        for q in batch:
            group = groups.get((q.market, q.symbol))
            if group is None:
                groups[(q.market, q.symbol)] = [q]
            else:
                group.append(q)
        out = RespBatch()
        ttl = self.ttl_s
        trim_stop = self.history_max - 1
        latest_keys: list[str] = []
        latest_args: list[Any] = []
        stats_keys: list[str] = []
        stats_args: list[Any] = [ttl]
        for (market, symbol), quotes in groups.items():
            if len(quotes) > 1:
                quotes.sort(key=_order)
            base = self._stream(market, symbol)
            docs = [encode_quote(q) for q in quotes]
            history = "history:" + base
            out.values("LPUSH", history, docs)  # oldest first in: the newest ends up at the head
            out.command("LTRIM", history, 0, trim_stop)
            first_day = quotes[0].ts // DAY_MS
            if first_day == quotes[-1].ts // DAY_MS:
                days = [(first_day, 0, len(quotes))]
            else:
                days = []
                start = 0
                for i in range(1, len(quotes)):
                    if quotes[i].ts // DAY_MS != quotes[start].ts // DAY_MS:
                        days.append((quotes[start].ts // DAY_MS, start, i))
                        start = i
                days.append((quotes[start].ts // DAY_MS, start, len(quotes)))
            for day_number, lo, hi in days:
                date = self._day(day_number)
                series = f"timeseries:{base}:{date}"
                day_quotes = quotes[lo:hi]
                out.scored("ZADD", series, [q.ts for q in day_quotes], docs[lo:hi])
                out.command("EXPIRE", series, ttl)
                prices = [q.price for q in day_quotes]
                first, last = day_quotes[0], day_quotes[-1]
                stats_keys.append(f"stats:{base}:{date}")
                stats_args += (
                    len(prices), sum(prices), min(prices), max(prices),
                    first.ts, first.price, last.ts, last.price,
                )  # fmt: skip
            newest = quotes[-1]
            latest_keys.append("latest:" + base)
            latest_args += (newest.ts, -1 if newest.seq is None else newest.seq, docs[-1])
        out.command("EVAL", LATEST_LUA, len(latest_keys), *latest_keys, *latest_args, data=True)
        out.command("EVAL", STATS_LUA, len(stats_keys), *stats_keys, *stats_args, data=True)
        return out


class CacheStage:
    """The running ``sow cache``: NATS ``quotes.>`` (queue group) -> :class:`CacheWriter`.

    Exposed so ``sow up`` and the tests can read its counters through :meth:`status`.
    """

    def __init__(self, settings: Settings, *, writer: CacheWriter | None = None) -> None:
        self.settings = settings
        self.writer = writer or CacheWriter.from_settings(settings)
        self.queue_group = settings.cache_queue_group
        self.invalid = 0
        self.state = "starting"
        self.started = time.time()
        self.instance = instance_id()
        self.nc: Client | None = None
        self._sub: Subscription | None = None
        self._symbols: set[str] = set()
        self.subscribed = asyncio.Event()

    @property
    def nats_connected(self) -> bool:
        return self.nc is not None and self.nc.is_connected

    def status(self) -> dict[str, Any]:
        """The heartbeat document published on ``sow.status.cache``."""
        w = self.writer
        s = w.stats
        state = self.state
        if state == "running" and not w.connected:
            state = "degraded"
        return {
            "component": COMPONENT,
            "instance": self.instance,
            "state": state,
            "since": self.started,
            "ts": time.time(),
            "queue_group": self.queue_group,
            "quotes_in": s.quotes_in,
            "written": s.written,
            "batches": s.batches,
            "last_flush_ms": None if s.last_flush_ms is None else round(s.last_flush_ms, 3),
            "pending": w.pending,
            "buffered_peak": s.buffered_peak,
            "redis_connected": w.connected,
            "nats_connected": self.nats_connected,
            "nats_pending": self._sub.pending_msgs if self._sub is not None else 0,
            "nats_dropped": dropped_by_client(self.nc),
            "dropped": s.dropped,
            "write_errors": s.write_errors,
            "invalid": self.invalid,
        }

    async def _on_msg(self, msg: Msg) -> None:
        try:
            quote = decode_quote(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            self.invalid += 1
            if self.invalid == 1 or self.invalid % 10_000 == 0:
                log.warning(
                    "skipping payloads that are not a Quote",
                    extra=kv(subject=msg.subject, error=str(exc), invalid=self.invalid),
                )
            return
        symbol = quote.symbol
        if symbol not in self._symbols:  # keys are made from it: only real symbol names
            if not SYMBOL_RE.match(symbol):
                self.invalid += 1
                if self.invalid == 1 or self.invalid % 10_000 == 0:
                    log.warning(
                        "skipping quotes with an invalid symbol",
                        extra=kv(subject=msg.subject, symbol=symbol[:40], invalid=self.invalid),
                    )
                return
            if len(self._symbols) >= 100_000:
                self._symbols.clear()
            self._symbols.add(symbol)
        self.writer.add(quote)

    async def _heartbeat(self) -> None:
        interval = self.settings.heartbeat_interval_seconds
        while True:
            await asyncio.sleep(interval)
            w = self.writer
            if not w.pending:
                await w.ping()  # no flush in progress tells us whether the server is (still) up
            await self._publish_status()

    async def _publish_status(self) -> None:
        nc = self.nc
        if nc is not None and nc.is_connected:
            with contextlib.suppress(Exception):
                await nc.publish(status_subject(COMPONENT), orjson.dumps(self.status()))

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Subscribe and write until ``stop`` is set; then write what is buffered and close."""
        stop = stop or asyncio.Event()
        await self.writer.start()
        beat: asyncio.Task[None] | None = None
        connecting = asyncio.create_task(
            connect(self.settings.nats_url, name="sow-cache", attempts=0), name="cache-nats"
        )
        stopper = asyncio.create_task(stop.wait(), name="cache-stop")
        try:
            await asyncio.wait({connecting, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if not connecting.done():
                return
            self.nc = connecting.result()
            self._sub = await self.nc.subscribe(
                QUOTES_WILDCARD,
                queue=self.queue_group,
                cb=self._on_msg,
                pending_msgs_limit=NATS_PENDING_MAX,
                pending_bytes_limit=NATS_PENDING_BYTES_MAX,
            )
            await self.nc.flush()
            self.state = "running"
            self.subscribed.set()
            log.info(
                "cache running",
                extra=kv(
                    nats=self.settings.nats_url, redis=self.writer.url, queue_group=self.queue_group
                ),
            )
            beat = asyncio.create_task(self._heartbeat(), name="cache-heartbeat")
            await self._publish_status()
            await stopper
        finally:
            self.state = "stopping"
            connecting.cancel()
            stopper.cancel()
            if self._sub is not None:
                with contextlib.suppress(Exception):
                    await self._sub.unsubscribe()
            await self.writer.stop()
            if beat is not None:
                beat.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await beat
            self.state = "stopped"
            await self._publish_status()
            if self.nc is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self.nc.close(), 1.0)
            s = self.writer.stats
            log.info(
                "cache stopped",
                extra=kv(quotes_in=s.quotes_in, written=s.written, dropped=s.dropped,
                         write_errors=s.write_errors, invalid=self.invalid),
            )  # fmt: skip


async def run_cache(settings: Settings, stop: asyncio.Event | None = None) -> CacheStage:
    """Run the cache stage until ``stop`` is set; returns it for its counters."""
    stage = CacheStage(settings)
    await stage.run(stop)
    return stage


__all__ = [
    "BATCH_MAX",
    "BUFFER_MAX",
    "CacheStage",
    "CacheStats",
    "CacheWriter",
    "day_of",
    "history_key",
    "latest_key",
    "run_cache",
    "stats_key",
    "stream_key",
    "timeseries_key",
]
