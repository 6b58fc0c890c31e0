"""QuestDB: the table schema (created explicitly at start) and the ILP/HTTP writer.

``market_data`` holds every Quote (the seed's columns first, then the Quote's other fields);
``candles`` holds klines backfilled from Bybit REST. Both are WAL tables partitioned by day with
DEDUP UPSERT keys, so a redelivered batch or a rerun backfill replaces rows instead of duplicating
them. :func:`ensure_tables` creates both at start (over the PostgreSQL wire, ``questdb_url``).

Writes go over ILP/HTTP (``questdb_http_url``) through :class:`QuestDBWriter`: one HTTP request
per batch, one transaction each; a failed request leaves the batch in its buffer so the caller
can retry it before acknowledging anything upstream.
"""

from __future__ import annotations

import asyncio
import contextlib
import warnings
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit, urlunsplit

from questdb import QuestDBError, Sender, TimestampNanos

from sowcli.errors import ConfigError, UpstreamError
from sowcli.model import Quote

with warnings.catch_warnings():  # the legacy module path is the documented home of Buffer
    warnings.simplefilter("ignore", DeprecationWarning)
    from questdb.ingress import Buffer

_Buffer = Buffer

MARKET_DATA_DDL = """
CREATE TABLE IF NOT EXISTS market_data (
    timestamp TIMESTAMP,
    symbol SYMBOL CAPACITY 1024 CACHE,
    market SYMBOL CAPACITY 4 CACHE,
    price DOUBLE,
    volume DOUBLE,
    high24h DOUBLE,
    low24h DOUBLE,
    change24h DOUBLE,
    turnover DOUBLE,
    bid DOUBLE,
    ask DOUBLE,
    mark_price DOUBLE,
    index_price DOUBLE,
    funding_rate DOUBLE,
    open_interest DOUBLE,
    seq LONG,
    recv_us LONG
) TIMESTAMP(timestamp) PARTITION BY DAY WAL
DEDUP UPSERT KEYS(timestamp, symbol, market, seq)
"""

CANDLES_DDL = """
CREATE TABLE IF NOT EXISTS candles (
    timestamp TIMESTAMP,
    symbol SYMBOL CAPACITY 1024 CACHE,
    market SYMBOL CAPACITY 4 CACHE,
    interval SYMBOL CAPACITY 16 CACHE,
    open DOUBLE,
    high DOUBLE,
    low DOUBLE,
    close DOUBLE,
    volume DOUBLE,
    turnover DOUBLE
) TIMESTAMP(timestamp) PARTITION BY DAY WAL
DEDUP UPSERT KEYS(timestamp, symbol, market, interval)
"""


# --- schema --------------------------------------------------------------------------------

TABLES_DDL = (MARKET_DATA_DDL, CANDLES_DDL)


def ensure_tables(questdb_url: str, timeout_s: float = 10.0) -> None:
    """Create ``market_data`` and ``candles`` when missing (synchronous; PostgreSQL wire).

    Idempotent (``CREATE TABLE IF NOT EXISTS``). Raises :class:`UpstreamError` naming the URL
    when QuestDB is unreachable or refuses the DDL. Async callers run it in a thread.
    """
    import psycopg

    try:
        with psycopg.connect(
            questdb_url, autocommit=True, connect_timeout=max(1, int(timeout_s))
        ) as conn:
            for ddl in TABLES_DDL:
                conn.execute(ddl)
    except psycopg.Error as exc:
        raise UpstreamError(
            f"QuestDB at {_redact(questdb_url)}: cannot create tables: {_first_line(exc)}"
        ) from None


def _redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
        return urlunsplit(parts._replace(netloc=netloc))
    return url


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


# --- ILP/HTTP writer -----------------------------------------------------------------------


def ilp_conf(http_url: str) -> str:
    """``http://host:9000`` -> the client's configuration string (``https`` keeps TLS).

    Auto-flush is off (we flush whole batches ourselves) and the client's own retries are short:
    the caller keeps the batch and retries with its own backoff.
    """
    raw = http_url if "://" in http_url else f"http://{http_url}"
    parts = urlsplit(raw)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"questdb_http_url {http_url!r}: expected http://HOST:PORT")
    port = parts.port or 9000
    conf = f"{parts.scheme}::addr={parts.hostname}:{port};auto_flush=off;retry_timeout=1000;"
    if parts.username:
        conf += f"username={parts.username};password={parts.password or ''};"
    return conf


_SYMBOLS: dict[
    tuple[str, str], dict[str, str | None]
] = {}  # read-only once built: shared per stream


def add_quote(buffer: Buffer, quote: Quote, table: str = "market_data") -> None:
    """Append one Quote as a row: ``symbol``/``market`` symbols, the other fields as columns.

    The designated timestamp is the exchange event time ``quote.ts`` (never server time), so a
    redelivered quote lands on the same DEDUP keys. ``None`` values are skipped (NULL).
    """
    symbols = _SYMBOLS.get((quote.symbol, quote.market))
    if symbols is None:
        if len(_SYMBOLS) > 100_000:  # bounded: symbols x markets
            _SYMBOLS.clear()
        symbols = _SYMBOLS[(quote.symbol, quote.market)] = {
            "symbol": quote.symbol,
            "market": quote.market,
        }
    buffer.row(
        table,
        symbols=symbols,
        columns={
            "price": quote.price,
            "volume": quote.volume,
            "high24h": quote.high24h,
            "low24h": quote.low24h,
            "change24h": quote.change24h,
            "turnover": quote.turnover,
            "bid": quote.bid,
            "ask": quote.ask,
            "mark_price": quote.mark_price,
            "index_price": quote.index_price,
            "funding_rate": quote.funding_rate,
            "open_interest": quote.open_interest,
            "seq": quote.seq,
            "recv_us": quote.recv_us,
        },
        at=TimestampNanos(quote.ts * 1_000_000),
    )


class _Lane:
    """One Sender and the one thread that creates, uses and closes it."""

    def __init__(self, conf: str, index: int) -> None:
        self.conf = conf
        self.sender: Sender | None = None
        self.thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"sow-questdb-{index}")

    # everything below runs in self.thread
    def open(self) -> int:
        if self.sender is None:
            sender = Sender.from_conf(self.conf)
            try:
                sender.establish()  # type: ignore[no-untyped-call]
            except BaseException:
                with contextlib.suppress(Exception):
                    sender.close(flush=False)
                raise
            self.sender = sender
        return int(self.sender.protocol_version)

    def write(self, buffer: Buffer) -> None:
        self.open()
        assert self.sender is not None
        try:
            self.sender.flush(buffer, clear=False)
        except BaseException:
            # A fresh sender next time: the failed one may hold a broken connection.
            sender, self.sender = self.sender, None
            with contextlib.suppress(Exception):
                sender.close(flush=False)
            raise

    def close(self) -> None:
        if self.sender is not None:
            with contextlib.suppress(Exception):
                self.sender.close(flush=False)
            self.sender = None


class QuestDBWriter:
    """Writes ILP buffers to QuestDB over HTTP, up to ``lanes`` requests at a time.

    The ``questdb`` Sender is not thread-safe, so each lane owns one Sender and one thread that
    creates, uses and closes it. The event loop fills :class:`Buffer` objects (plain memory,
    handed over whole) and awaits :meth:`write`, which keeps the buffer intact when the write
    fails (``flush(buffer, clear=False)``): the caller retries with the same rows and
    acknowledges its source only after a write returned. Each HTTP request is one transaction.
    Two lanes let QuestDB commit one batch while the next is on the wire (measured: the wait for
    a single synchronous request was what bounded ``persist``, not CPU).
    """

    def __init__(self, http_url: str, *, lanes: int = 2, init_buf_rows: int = 5000) -> None:
        self.http_url = http_url
        self.conf = ilp_conf(http_url)
        self.lanes = max(1, lanes)
        self.init_buf_size = max(64 * 1024, init_buf_rows * 240)
        self.protocol_version: int | None = None
        self._lanes = [_Lane(self.conf, i) for i in range(self.lanes)]
        self._idle: asyncio.Queue[_Lane] = asyncio.Queue()
        for lane in self._lanes:
            self._idle.put_nowait(lane)
        self._free: list[Buffer] = []

    async def open(self) -> None:
        """Connect (the HTTP client asks the server for its protocol version): raises when down."""
        lane = self._lanes[0]
        try:
            version = await asyncio.get_running_loop().run_in_executor(lane.thread, lane.open)
        except QuestDBError as exc:
            raise UpstreamError(f"QuestDB at {self.http_url}: {_first_line(exc)}") from None
        if self.protocol_version is not None and version != self.protocol_version:
            self._free.clear()  # buffers of the old protocol version are not reusable
        self.protocol_version = version

    def new_buffer(self) -> Buffer:
        """A cleared buffer of the server's protocol version (recycled through :meth:`release`)."""
        if self._free:
            return self._free.pop()
        if self.protocol_version is None:
            raise RuntimeError("QuestDBWriter.open() first")
        return _Buffer(protocol_version=self.protocol_version, init_buf_size=self.init_buf_size)

    def release(self, buffer: Buffer) -> None:
        buffer.clear()  # type: ignore[no-untyped-call]
        if len(self._free) < 4 * self.lanes:
            self._free.append(buffer)

    async def write(self, buffer: Buffer) -> None:
        """Send ``buffer`` as one HTTP request; the rows stay in it when this raises."""
        lane = await self._idle.get()
        try:
            await asyncio.get_running_loop().run_in_executor(lane.thread, lane.write, buffer)
        except QuestDBError as exc:
            raise UpstreamError(f"QuestDB at {self.http_url}: {_first_line(exc)}") from None
        finally:
            self._idle.put_nowait(lane)

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        for lane in self._lanes:
            with contextlib.suppress(Exception):
                await loop.run_in_executor(lane.thread, lane.close)
            lane.thread.shutdown(wait=False)


__all__ = [
    "CANDLES_DDL",
    "MARKET_DATA_DDL",
    "Buffer",
    "QuestDBWriter",
    "add_quote",
    "ensure_tables",
    "ilp_conf",
]
